"""fastdp"""
