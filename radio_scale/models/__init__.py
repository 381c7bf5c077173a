"""radio_scale.models"""
