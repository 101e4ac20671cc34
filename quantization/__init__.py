"""nilmc.quantization"""
