"""What runs the model for people: the command line (`cli`), labelling files and folders (`predict`,
`dist`), the demo page (`demo`), timing (`bench`), the ONNX export and runner (`onnx_engine`), figures
(`plot`) and the one-line user errors they share (`errors`)."""
