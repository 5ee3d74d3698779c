"""Policy and guardrails on the generation path (docs/security.md, "Policy").

- `pii.py`: the PII detectors; `scrub.py`: the built-in guardrail (PII actions, content filters)
  on the input and, with a hold-back window, on the output stream.
- `document.py`: a policy document per scope (global, tenant, tenant+model) and their merge.
- `hooks.py`: the one hook interface (pre: rewrite or deny; post: rewrite or stop) and `Guard`, what
  `server/generation.py` calls; deployments add hooks with `policy.hooks`.
- `store.py`: versioned documents in state.db or Redis; `admin.py`: `/admin/policies`.
- `opa.py`: the OPA decision (a remote OPA server, or a `.rego` file evaluated in-process).
"""
