"""Where rows come from and go to: fsspec locations (`storage`), reading and checking input rows
(`batch_input`), and result and error lines in the OpenAI Batch format (`batch_output`).
"""
