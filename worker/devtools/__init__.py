"""Developer tooling: the Graph and Entra ID simulator, its certificates, and the demo.

Production commands (`invite-worker run`, `invite-worker healthcheck`) never import this
package; `tests/unit/test_layering.py` checks that they do not.
"""
