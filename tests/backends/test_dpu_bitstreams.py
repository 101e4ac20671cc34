"""DPU target descriptions and the board table (package data of nilmc.bitstreams)."""
from __future__ import annotations

import json

import pytest

from nilmc.bitstreams import available_targets, boards_for, load_boards, load_target, target_from_arch_json
from nilmc.compiler.errors import BadInputError


def test_shipped_targets() -> None:
    assert available_targets() == ["b2304", "b4096"]
    b2304, b4096 = load_target("b2304"), load_target("DPUCZDX8G_ISA1_B4096")
    assert (b2304.channel_parallel, b2304.pixel_parallel, b2304.bank_depth) == (12, 8, 2048)
    assert (b4096.channel_parallel, b4096.pixel_parallel, b4096.bank_depth) == (16, 8, 2048)
    assert b2304.fingerprint == "0x0101000056010405" and b4096.fingerprint == "0x0101000056010407"
    assert b2304.arch == {"fingerprint": "0x0101000056010405"}
    assert b2304.max_channels == 3072 and b4096.max_channels == 4096
    assert b2304.limits["conv_kernel"] == [1, 16] and b2304.limits["shift_cut"] == [0, 16]
    assert load_target("dpu:B2304") == load_target("b2304")


def test_unknown_target_is_a_typed_error() -> None:
    with pytest.raises(BadInputError, match="available: b2304, b4096"):
        load_target("b1024")


def test_overlay_arch_json_by_fingerprint_or_name(tmp_path) -> None:
    by_fp = tmp_path / "a.json"
    by_fp.write_text(json.dumps({"fingerprint": "0x101000056010405"}))
    assert target_from_arch_json(by_fp).precision == "b2304"
    by_name = tmp_path / "b.json"
    by_name.write_text(json.dumps({"target": "DPUCZDX8G_ISA1_B4096"}))
    t = target_from_arch_json(by_name)
    assert t.precision == "b4096" and t.arch == {"target": "DPUCZDX8G_ISA1_B4096"} and t.arch_source == str(by_name)
    unknown = tmp_path / "c.json"
    unknown.write_text(json.dumps({"fingerprint": "0x1000020F6014406"}))
    with pytest.raises(BadInputError, match="no description"):
        target_from_arch_json(unknown)
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(BadInputError, match="cannot read arch.json"):
        target_from_arch_json(tmp_path / "d.json")


def test_board_table_is_seed_003_table_8() -> None:
    boards = load_boards()
    u96 = boards["ULTRA96V1"]
    assert (u96.tdp_w, u96.cost_usd, u96.dpu) == (24, 249, "b2304")
    assert (boards["RP4"].tdp_w, boards["RP4"].cost_usd) == (9, 75)
    assert (boards["NANO"].tdp_w, boards["XAVIERNX"].cost_usd, boards["IMX8P"].tdp_w) == (10, 399, 15)
    f = u96.figures(80.76)  # seed 003 Table 7, Vitis-AI QAT
    assert f["eacc_per_tdp_watt"] == pytest.approx(3.365) and f["eacc_per_usd"] == pytest.approx(0.3243, abs=1e-4)
    assert f["published_table12"]["eacc_per_usd"] == 0.32  # the paper's 80.76 / 249


def test_b4096_boards_have_no_table_8_facts() -> None:
    rows = [b.figures(85.0) for b in boards_for(load_target("b4096"))]
    assert [r["board"] for r in rows] == ["ZCU102", "ZCU104", "KV260"]
    assert all(r["eacc_per_tdp_watt"] is None and r["eacc_per_usd"] is None for r in rows)
