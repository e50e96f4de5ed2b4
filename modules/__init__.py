"""Model maths of UPRet and CiCo: encoders, heads, similarity, optimal transport, loss, metrics."""
