"""Tool calling: a request's tools checked and planned (plan.py), the grammars that enforce
calls (grammars.py), and the model's output split into content and calls as it streams
(streaming.py, on formats.py and partial_json.py)."""
