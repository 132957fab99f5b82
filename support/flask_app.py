"""A real Flask application, served unchanged by doordown in the tests."""

import threading

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.route("/")
def index():
    return "Hello from Flask"


@app.route("/items/<int:item>", methods=["GET", "POST"])
def item(item):
    payload = request.get_json(silent=True) if request.method == "POST" else None
    return jsonify(item=item, method=request.method, payload=payload,
                   args=request.args.to_dict(), thread=threading.get_ident())


@app.route("/boom")
def boom():
    raise ValueError("flask view failed")
