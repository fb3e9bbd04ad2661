"""The migration workflow: readable steps, each with its compensation, a journal, a reconciler.

Faces (the ``ptmig`` CLI, ``ptmigd``) call :class:`host.workflow.coordinator.Coordinator`;
the workflow knows no face.
"""
