"""The Gradio app: the service (validation, files, neighbours) and the UI over it, built by
``build_demo(service)``. Depends on the core, audio and copy-detection packages.
"""
