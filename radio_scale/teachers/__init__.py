"""radio_scale.teachers"""
