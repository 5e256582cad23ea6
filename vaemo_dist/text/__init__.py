"""Stage 2 text side: MLLM affective descriptions (describe.py), their frozen text embeddings
(encode.py), and text-to-VA retrieval evaluation (retrieval.py)."""
