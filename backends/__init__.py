"""nilmc.backends"""
