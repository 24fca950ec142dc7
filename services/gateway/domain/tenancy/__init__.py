"""Tenancy: teams and their tiers, keys and what they may do (scopes, models, expiry,
rotation), the limits and budgets that apply to a request at each level, enterprise
identity (JWT claims into a caller) and the audit trail. No transport here: the stores,
the audit stream and the JWKS are protocols in ``ports.py``, adapters implement them."""
