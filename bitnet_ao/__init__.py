"""bitnet_ao"""
