"""nilmc.bitstreams"""
