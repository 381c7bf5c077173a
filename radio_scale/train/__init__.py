"""radio_scale.train"""
