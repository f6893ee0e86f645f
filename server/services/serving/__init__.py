"""Serving: a request's way from the route to its scheduler. Generation (`generation`, with its events when streamed:
`streaming`), sentiment (`sentiment`), the blocked-terms policy (`prompt_policy`), the stored history (`history`)."""
