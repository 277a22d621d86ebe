"""ONNX export: `export_onnx` (entry point, `onnx`), graph assembly (`graph`) from the emitter
tables (`registry`, `emitters/`), verification in ONNX Runtime (`verify`), file handling
(`files`) and TIDL's options and constraints (`tidl`)."""
