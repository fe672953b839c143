"""Request and response models of the v1 API (pydantic v2), one module per resource.

Validation happens here, before anything touches Redis or the model: a request that fails any rule is
answered 422 and changes nothing. Every model forbids unknown fields so a misspelt field name is an
error rather than a silently ignored option.
"""
