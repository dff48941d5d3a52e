"""Prompts the benchmarks share (no imports: the lite benchmarks stay torch-free)."""

# Short code prompts for greedy continuations (speculative.py's free rows, quant_agreement.py, cpu_peer.py's
# agreement): the first is cpu_peer's one timed prompt.
CODE_PROMPTS = (
    "import os\nimport sys\n\n\ndef read_lines(path):\n    \"\"\"Return the lines of the file at path.\"\"\"\n",
    "def fibonacci(n):", "class LinkedList:", "import os\n\ndef list_files(path):", "def quicksort(arr):\n",
    "for i in range(10):\n", "import numpy as np\n\ndef mean(x):\n", "class Stack:\n    def __init__(self):\n",
)
