"""Batch offload: non-urgent work queued durably and run through the providers' batch APIs or the local models."""
