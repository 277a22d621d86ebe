"""ONNX emitters, one module per op family; each is `emit(builder, fx_node, module_or_None)`.

An emitter writes the ONNX nodes that compute one FX node and records the result's name in
`builder.env`; `quantfx.export.registry` says which emitter serves which module type, function
or Tensor method.
"""
