"""An OpenAI-compatible Batch API on your own cluster: `/v1/files` and `/v1/batches` over Prefect.

    config.py   ApiConfig: storage, the models requests may name, the bearer key, the deployment
    app.py      the ASGI app (FastAPI): the endpoints, the key check, OpenAI's error shape, the sweeper
    service.py  what the endpoints do: upload, check the file, create the run, observe, cancel
    runs.py     each batch is a flow run of the batch deployment: create, read, cancel, recover
    server.py   `rayllm api`: the app, and the batch deployment served from the same process

The objects, the store and the input checks need no Prefect: `prefect_rayllm.rayllm_stages.batch_api`.

Example (an existing OpenAI batch script, pointed at your cluster):
    ```python
    from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ["RAYLLM_API_KEY"])
    batch_file = client.files.create(file=open("requests.jsonl", "rb"), purpose="batch")
    batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    ```
"""
