"""nilmc.calibration_data"""

if __name__ != "nilmc.calibration_data":  # a bare-folder import would load a second copy of every nilmc class
    raise ImportError(f"{__name__!r} is a folder of nilmc, not a package of its own: import nilmc.calibration_data instead "
                      "(install nilmc with `pip install -e .`; importing the bare folder would create a second copy of its classes)")
