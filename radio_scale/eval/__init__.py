"""radio_scale.eval"""
