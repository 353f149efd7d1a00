"""What the tools share about ONNX graphs, on onnx_ir: finding linears, inlining custom nodes, running a graph
on onnxruntime. It sits below export and the tools and above the floors; only `onnxkit.session` imports
onnxruntime, so export (which never runs a graph) may use the rest."""
