"""Test helpers that are real components: an S3 request-counting proxy."""
