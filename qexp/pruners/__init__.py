"""The prune group: P, applied after the defense and before the quantizer (Q(P(D(M))))."""
