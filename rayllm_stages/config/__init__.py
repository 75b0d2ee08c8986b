"""Job configuration shared by YAML files, the CLI and the flows: strict pydantic models (`base`) and the
batch and chain job configs with the model spec and sampling (`models`).
"""
