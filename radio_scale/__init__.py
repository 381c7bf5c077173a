"""radio_scale: agglomerative multi-teacher distillation (AM-RADIO) at cluster scale."""
__version__ = "0.1.0"
