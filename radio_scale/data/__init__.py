"""radio_scale.data"""
