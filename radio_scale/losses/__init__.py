"""radio_scale.losses"""
