"""The OpenMMLab tasks: det (mmdet) and seg (mmseg) on a shared base (tasks/mm/base.py); everything
that imports mmengine/mmdet/mmseg lives in tasks/mm/openmmlab.py."""
