"""nilmc.compiler"""
