"""A plain-HTTP client for TF Serving's REST API (works against `algpt2 serve` and real TF Serving)."""

import json
import urllib.error
import urllib.request


class ServingClientError(RuntimeError):
    """The server answered with an error (its `{"error": ...}` message)."""


class ServingClient:
    """Talks to `/v1/models/{name}` on a TF Serving REST endpoint.

    Args:
        url: the server, e.g. `http://127.0.0.1:8501`.
        model_name: the served model's name.
        version: a specific version, or None for the latest.
        timeout: seconds per request.

    Example (`url` is where `algpt2 serve` listens, e.g. "http://127.0.0.1:8501"; the
    test suite runs it against a live server):
    >>> client = ServingClient(url, "algpt2")
    >>> [text.startswith("Hello") for text in client.generate(["Hello"], max_new_tokens=4)["text"]]
    [True]
    """

    def __init__(self, url, model_name, version=None, timeout=120.0):
        self.base = url.rstrip("/") + f"/v1/models/{model_name}"
        if version is not None:
            self.base += f"/versions/{version}"
        self.timeout = timeout

    def _request(self, suffix, body=None):
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base + suffix, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", "")
            except ValueError:
                message = e.reason
            raise ServingClientError(f"HTTP {e.code}: {message}") from None

    def status(self):
        return self._request("")

    def metadata(self):
        return self._request("/metadata")

    def predict(self, inputs=None, instances=None, signature_name="serving_default"):
        body = {"signature_name": signature_name}
        if instances is not None:
            body["instances"] = instances
        else:
            body["inputs"] = inputs
        return self._request(":predict", body)

    def logits(self, input_ids, attention_mask=None):
        """Logits `[batch, seq, vocab]` for int id lists (the `serving_default` signature)."""
        mask = attention_mask or [[1] * len(row) for row in input_ids]
        return self.predict({"input_ids": input_ids, "attention_mask": mask})["outputs"]

    def generate(self, prompts, max_new_tokens=32, temperature=1.0, top_k=1, top_p=1.0, seed=0):
        """Text in, text out (the `generate` signature); `top_k=1` is greedy."""
        return self.predict({"prompts": list(prompts), "max_new_tokens": max_new_tokens,
                             "temperature": temperature, "top_k": top_k, "top_p": top_p,
                             "seed": seed}, signature_name="generate")["outputs"]
