"""radio_scale.distributed"""
