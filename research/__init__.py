"""Research binaries built on tff_fad."""
