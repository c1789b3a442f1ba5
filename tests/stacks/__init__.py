"""Stand-ins of real training stacks (written from their conventions, not copied): karpathy/nanoGPT,
EleutherAI/nanoGPT-mup, microsoft/mup's examples. Tests import them; `verify --model FILE.py:Class` can too."""
