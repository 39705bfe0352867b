"""Our op inside other libraries' models, one module each (each an optional extra):

- `windowed_attention.integrations.transformers`: Hugging Face transformers' attention interface
  (`pip install "windowed-attention[transformers]"`).
"""
