"""Serving trained models over HTTP (`iqa-dist serve`): the API (app.py), the one batching queue
in front of the models (batcher.py), uploads through predict's decode path (uploads.py),
listening (server.py) and the page at / (page.html). Above scoring/: it scores through `Scorer`.
Importing this package is cheap; FastAPI and uvicorn load with app.py and server.serve.
"""

TOKEN_ENV = "IQA_DIST_TOKEN"  # where `serve` reads a token that is not given with --token
