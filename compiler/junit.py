"""JUnit XML for CI systems: one test case per target."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nilmc.compiler.driver import CompileSummary


def junit_xml(summary: CompileSummary) -> str:
    failures = sum(1 for r in summary.results if r.error is None and not r.passed)
    errors = sum(1 for r in summary.results if r.error is not None)
    suite = ET.Element("testsuite", name="nilmc.compile", tests=str(len(summary.results)), failures=str(failures), errors=str(errors))
    for r in summary.results:
        case = ET.SubElement(suite, "testcase", classname=f"nilmc.{r.target.backend}", name=str(r.target), time=f"{r.compile_s:.3f}")
        if r.error is not None:
            ET.SubElement(case, "error", message=r.error).text = r.error
        elif not r.passed and r.report is not None:
            msg = r.report.failure_line()  # the violations worst first, then the likely cause
            ET.SubElement(case, "failure", message=msg).text = str(r.report)
        if r.report is not None:
            ET.SubElement(case, "system-out").text = str(r.report)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
