"""nilmc.calibration_data"""
