"""Conversion of the released ML-Mamba weights (original checkpoint + timm vision towers) to this package."""
