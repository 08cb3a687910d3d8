"""Edits of the weights: the one writer (ParameterEdit) and the edits built on it (QK, OV, circuit, gauge)."""
