"""Post-training calibration: `prepare` a float model, `calibrate` its quantization ranges.

`prepare` and `calibrate` are the stages (`quantfx.ptc.stages`); what calibration does once
every range is observed lives beside them, one module per step, in the order it runs:
measured mixed precision (`quantfx.ptc.mixed_precision`), each layer's weight exponent by its
output error (`quantfx.ptc.weight_search`), weight rounding (`quantfx.ptc.error_feedback`, the
default, or `quantfx.ptc.learned_rounding`) and bias calibration
(`quantfx.ptc.bias_calibration`), both on the layer-by-layer two-stream pass of
`quantfx.ptc.reconstruction`, then the check against float (`quantfx.ptc.calibration_check`).
"""

from quantfx.ptc.stages import batch_inputs, calibrate, iterate_batches, prepare

__all__ = ["batch_inputs", "calibrate", "iterate_batches", "prepare"]
