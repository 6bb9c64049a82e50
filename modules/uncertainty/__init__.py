"""How far to trust a prediction: its spread (spread), that spread calibrated on the validation designs
(calibration), and where a new design lies against the training designs (design_range)."""
