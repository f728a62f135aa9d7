"""LabelLoop: annotate, retrain and infer with a LabelLoop (MONAI Label) server from 3D Slicer.

The module follows Slicer's scripted module template: :class:`LabelLoop` (metadata), :class:`LabelLoopWidget`
(wires the panel), :class:`LabelLoopLogic` (does the work, never touches widgets) and :class:`LabelLoopTest`.
Everything that does not need Slicer - REST client, ``.seg.nrrd`` conversion by segment name, workflow, background
jobs - lives in the ``LabelLoopLib`` package next to this file and is tested without Slicer.

Threading: network calls run in background threads (``LabelLoopLib.workflow.JobRunner``); a 200 ms ``QTimer`` on
the main thread polls the jobs and applies their results, because MRML nodes and Qt widgets may only be touched
from the main thread.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LabelLoopLib import colors as llcolors
from LabelLoopLib.client import EXPLAIN_METHODS, LabelLoopClient, default_client_id, normalize_url
from LabelLoopLib.workflow import (
    QUEUE_HEADERS,
    AnnotationSession,
    AutoSegmentation,
    BatchProgress,
    ClassificationResult,
    JobBusy,
    JobContext,
    JobMessage,
    JobRunner,
    Sample,
    ServerInfo,
    SubmitResult,
    TrainingProgress,
    curve_axis_title,
    curve_columns,
    default_cache_dir,
    describe_error,
    finding_from_ras,
    parse_history,
    queue_table,
    serialize_history,
    train_params,
    training_from_stats,
    update_history,
)

SETTINGS_HISTORY = "LabelLoop/ServerHistory"
SETTINGS_LOAD_NEXT = "LabelLoop/LoadNextAfterSubmit"
SETTINGS_ANNOTATOR = "LabelLoop/Annotator"
DEFAULT_SERVER = "http://127.0.0.1:8000"
POLL_MS = 200
STATUS_POLL_TICKS = 10  # training / batch status every 10 * 200 ms
BACKGROUND_JOBS = ("train-poll", "batch-poll")


#
# LabelLoop
#


class LabelLoop(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LabelLoop"
        self.parent.categories = ["Active Learning"]
        self.parent.dependencies = []
        self.parent.contributors = ["LabelLoop developers"]
        self.parent.helpText = """
Annotate CT and MR images with a LabelLoop server (a MONAI Label app): fetch the next image chosen by active
learning, pre-segment it with the current model, correct it with the Segment Editor, submit it as a final
label, and retrain the model while you continue. Segments are matched to the server's structures <b>by name</b>
(not by order or color); segments with names the server does not know are reported before anything is stored.
"""
        self.parent.acknowledgementText = """
LabelLoop builds on <a href="https://monai.io/label.html">MONAI Label</a> and
<a href="https://monai.io">MONAI</a>; the panel layout follows 3D Slicer's scripted module template and the
MONAI Label and MONAI Auto3DSeg Slicer extensions.
"""


#
# LabelLoopWidget
#


class LabelLoopWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: every button starts a Logic call in a background job; results arrive through ``onTimer``."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[LabelLoopLogic] = None
        self.timer: Optional[qt.QTimer] = None
        self._ticks = 0
        self._pollTraining = False
        self._trainingWasRunning = False
        self._pollBatch = False
        self._batchWasRunning = False
        self._pollFailures = 0

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LabelLoop.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LabelLoopLogic()

        self.ui.segmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.ui.batchImagesComboBox.addItems(["unlabeled", "all"])
        self.ui.explainMethodComboBox.addItems(list(EXPLAIN_METHODS))
        self.ui.classTableWidget.setHorizontalHeaderLabels(["Class", "Probability"])
        self.ui.diceTableWidget.setHorizontalHeaderLabels(["Structure", "Dice"])
        self.ui.queueTableWidget.setHorizontalHeaderLabels(QUEUE_HEADERS)
        for table in (self.ui.classTableWidget, self.ui.diceTableWidget, self.ui.queueTableWidget):
            table.horizontalHeader().setStretchLastSection(True)
            table.verticalHeader().setVisible(False)
        self.ui.queueTableWidget.setVisible(False)  # until asked for
        self.ui.queueTableWidget.toolTip = "Double-click an image to lease it and load it for annotation"
        self.queueStrategy = "random"
        self.ui.classificationCollapsibleButton.setVisible(False)

        history = self.logic.loadServerHistory()
        self.ui.serverComboBox.addItems(history or [DEFAULT_SERVER])
        self.ui.loadNextCheckBox.checked = self.logic.loadSetting(SETTINGS_LOAD_NEXT, True)
        self.ui.annotatorLineEdit.placeholderText = default_client_id()
        self.ui.annotatorLineEdit.text = self.logic.loadText(SETTINGS_ANNOTATOR)

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.serverComboBox.lineEdit().connect("returnPressed()", self.onConnect)
        self.ui.annotatorLineEdit.connect("returnPressed()", self.onConnect)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.showQueueButton.connect("clicked(bool)", self.onShowQueue)
        self.ui.queueTableWidget.connect("cellDoubleClicked(int,int)", self.onQueueRowChosen)
        self.ui.autoSegmentButton.connect("clicked(bool)", self.onAutoSegment)
        self.ui.newSegmentationButton.connect("clicked(bool)", self.onNewSegmentation)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.loadNextCheckBox.connect("toggled(bool)", self.onLoadNextToggled)
        self.ui.predictClassButton.connect("clicked(bool)", self.onPredictClass)
        self.ui.submitClassButton.connect("clicked(bool)", self.onSubmitClass)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainButton.connect("clicked(bool)", self.onStopTrain)
        self.ui.showCurveButton.connect("clicked(bool)", self.onShowCurve)
        self.ui.uploadVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onUploadVolumeChanged)
        self.ui.uploadButton.connect("clicked(bool)", self.onUpload)
        self.ui.batchInferButton.connect("clicked(bool)", self.onBatchInfer)
        self.ui.batchStopButton.connect("clicked(bool)", self.onBatchStop)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onTimer)
        self.timer.start()
        self.updateButtons()

    def cleanup(self) -> None:
        """Called when the application closes or the module is reloaded."""
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.runner.cancel()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is not None:
            self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())

    def exit(self) -> None:
        # Leave no effect active (painting) while another module is shown.
        self.ui.segmentEditorWidget.setActiveEffect(None)

    def onSceneEndClose(self, caller, event) -> None:
        self.logic.forgetNodes()
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.ui.currentImageLabel.text = "-"
        self.updateButtons()

    # ---------------------------------------------------------------------------------------------- utilities

    def setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        logging.info("LabelLoop: %s", text)

    def showError(self, what: str, error: BaseException, popup: bool = True) -> None:
        """Explain a failure in the panel and (unless ``popup`` is False) in a dialog."""
        message = f"{what}: {describe_error(error)}"
        self.setStatus(message)
        logging.error("LabelLoop: %s", message)
        if popup:
            slicer.util.errorDisplay(message, windowTitle="LabelLoop")

    def startJob(
        self,
        name: str,
        fn: Callable[[JobContext], Any],
        onDone: Optional[Callable[[Any], None]] = None,
        what: str = "",
        popup: bool = True,
        onFailed: Optional[Callable[[BaseException], None]] = None,
    ) -> bool:
        """Run ``fn`` in the background; ``onDone`` and errors are handled on the main thread by ``onTimer``."""
        try:
            self.logic.runner.submit(
                name,
                fn,
                on_done=onDone,
                on_failed=onFailed or (lambda e: self.showError(what or name, e, popup)),
                on_progress=self.onJobProgress,
                on_cancelled=lambda: self.setStatus(f"{what or name}: cancelled"),
            )
        except JobBusy:
            self.setStatus(f"{what or name} is already running")
            return False
        if what:
            self.setStatus(f"{what}...")
        self.updateButtons()
        return True

    def onJobProgress(self, message: JobMessage) -> None:
        self.setStatus(message.text)

    def ensureConnected(self) -> bool:
        if self.logic.session is None or self.logic.session.server is None:
            self.setStatus("Connect to a server first.")
            return False
        return True

    def ensurePynrrd(self) -> bool:
        """pynrrd reads and writes segmentations; offer to install it when missing."""
        if self.logic.hasPynrrd():
            return True
        if not slicer.util.confirmOkCancelDisplay(
            "LabelLoop needs the Python package 'pynrrd' to read and write segmentation files. Install it now?",
            windowTitle="LabelLoop",
        ):
            self.setStatus("pynrrd is not installed: segmentations cannot be exchanged with the server.")
            return False
        with slicer.util.tryWithErrorDisplay("Failed to install pynrrd", waitCursor=True):
            self.logic.installPynrrd()
        return self.logic.hasPynrrd()

    def updateButtons(self) -> None:
        logic = self.logic
        connected = logic is not None and logic.session is not None and logic.session.server is not None
        hasImage = connected and logic.volumeNode is not None
        hasSegmentation = hasImage and logic.segmentationNode is not None
        running = logic is not None and logic.runner.is_running()
        busy = logic is not None and any(not j.finished for j in logic.runner.jobs() if j.name not in BACKGROUND_JOBS)
        buttons = (self.ui.nextSampleButton, self.ui.showQueueButton, self.ui.trainButton, self.ui.stopTrainButton)
        for button in (*buttons, self.ui.uploadButton):
            button.enabled = connected
        self.ui.batchInferButton.enabled = connected
        self.ui.batchStopButton.enabled = connected
        self.ui.autoSegmentButton.enabled = hasImage
        self.ui.newSegmentationButton.enabled = hasImage
        self.ui.submitButton.enabled = hasSegmentation
        self.ui.predictClassButton.enabled = hasImage
        self.ui.submitClassButton.enabled = hasImage and self.ui.classComboBox.count > 0
        self.ui.uploadButton.enabled = connected and self.ui.uploadVolumeSelector.currentNode() is not None
        self.ui.busyProgressBar.setVisible(busy)
        self.ui.cancelButton.setVisible(busy)
        self.ui.cancelButton.enabled = running

    # ------------------------------------------------------------------------------------------------ timer

    def onTimer(self) -> None:
        """Apply finished jobs' results; every 2 s refresh training and batch status while they run."""
        try:
            finished = self.logic.runner.poll()
        except Exception as e:  # a result callback failed: report, keep the timer running
            self.showError("Updating the panel", e)
            finished = []
        if finished:
            self.updateButtons()
        self._ticks += 1
        if self._ticks % STATUS_POLL_TICKS:
            return
        session = self.logic.session
        if session is None:
            return
        if self._pollTraining and not self.logic.runner.is_running("train-poll"):
            self.startJob(
                "train-poll", lambda ctx: session.poll_training(), self.onTrainingProgress, onFailed=self.onPollFailed
            )
        if self._pollBatch and not self.logic.runner.is_running("batch-poll"):
            self.startJob(
                "batch-poll", lambda ctx: session.poll_batch(), self.onBatchProgress, onFailed=self.onPollFailed
            )

    def onPollFailed(self, error: BaseException) -> None:
        """Status polls fail quietly (no dialog every 2 s); after three failures in a row they stop."""
        self._pollFailures += 1
        if self._pollFailures >= 3:
            self._pollTraining = self._pollBatch = False
            self.showError("Status updates stopped", error)
        else:
            self.setStatus(f"Status update failed: {describe_error(error)}")

    def onCancel(self) -> None:
        count = 0
        for job in self.logic.runner.jobs():
            if job.name not in BACKGROUND_JOBS and not job.finished:
                job.cancel()
                count += 1
        self.setStatus("Cancelling..." if count else "Nothing to cancel")

    # ------------------------------------------------------------------------------------------------ server

    def onConnect(self) -> None:
        text = self.ui.serverComboBox.currentText.strip()
        try:
            url = normalize_url(text)
        except ValueError as e:
            self.setStatus(f"Invalid server address: {e}")
            return
        if not self.ensurePynrrd():
            return
        # Status polls belong to the previous server.
        self._pollTraining = self._pollBatch = False
        for name in BACKGROUND_JOBS:
            self.logic.runner.cancel(name)
        annotator = self.ui.annotatorLineEdit.text.strip()
        self.logic.saveSetting(SETTINGS_ANNOTATOR, annotator)
        session = self.logic.connect(url, annotator or None)
        self.startJob(
            "connect", lambda ctx: session.connect(), lambda info: self.onConnected(url, info), f"Connecting to {url}"
        )

    def onConnected(self, url: str, info: ServerInfo) -> None:
        history = update_history(self.logic.loadServerHistory(), url)
        self.logic.saveServerHistory(history)
        self.ui.serverComboBox.blockSignals(True)
        self.ui.serverComboBox.clear()
        self.ui.serverComboBox.addItems(history)
        self.ui.serverComboBox.setCurrentIndex(0)
        self.ui.serverComboBox.blockSignals(False)

        models = []
        for m in info.models.values():
            state = "" if m.trained is None else (" (trained)" if m.trained else " (not trained yet)")
            models.append(f"{m.name} [{m.type}]{state}")
        structures = ", ".join(
            f"{n}={v}" for n, v in sorted(self.logic.session.label_map.items(), key=lambda kv: kv[1])
        )
        self.ui.serverInfoLabel.text = f"{'; '.join(models) or 'no models'}\nStructures: {structures or '-'}"
        self.ui.strategyComboBox.clear()
        self.ui.strategyComboBox.addItems(info.strategies)
        self.showDatastoreProgress(info.datastore.completed, info.datastore.total)
        self.ui.modelMetricsLabel.text = info.metrics_summary()

        classification = info.classification_model
        self.ui.classificationCollapsibleButton.setVisible(classification is not None)
        self.ui.classComboBox.clear()
        if classification is not None:
            self.ui.classComboBox.addItems(classification.classes)

        seg = info.segmentation_model
        stats = training_from_info(info, seg.name if seg else "")
        if stats is not None:
            self.onTrainingProgress(stats)
        # One status poll each: picks up a training or batch inference that is already running.
        self._pollTraining = self._pollBatch = True
        self._pollFailures = 0
        self.setStatus(f"Connected to {info.name or 'server'} {info.version} at {url}")
        self.updateButtons()

    def showDatastoreProgress(self, completed: int, total: int) -> None:
        self.ui.datastoreProgressBar.maximum = max(1, total)
        self.ui.datastoreProgressBar.value = min(completed, max(1, total))
        self.ui.datastoreProgressBar.format = f"{completed}/{total} images labeled"

    # ------------------------------------------------------------------------------------------------ annotation

    def onNextSample(self) -> None:
        if not self.ensureConnected():
            return
        strategy = self.ui.strategyComboBox.currentText or "random"
        self.startSampleJob(
            lambda session, cancel, report: session.next_sample(strategy, cancel=cancel, progress=report),
            "Fetching the next image",
        )

    def onQueueRowChosen(self, row: int, column: int) -> None:
        """A double-clicked row of the queue: lease that image and load it, as *Next sample* does its top one."""
        item = self.ui.queueTableWidget.item(row, 1)
        if item is None or not item.text() or not self.ensureConnected():
            return
        image_id, strategy = item.text(), self.queueStrategy
        self.startSampleJob(
            lambda session, cancel, report: session.take_sample(image_id, strategy, cancel=cancel, progress=report),
            f"Fetching {image_id}",
        )

    def startSampleJob(self, get: Callable[..., Optional[Sample]], what: str) -> None:
        """Download an image in the background with a progress bar; ``get(session, cancel, report)`` fetches it."""
        session = self.logic.session

        def fetch(ctx: JobContext) -> Optional[Sample]:
            def report(done: int, total: Optional[int]) -> None:
                size = f"{done / 1e6:.1f}" + (f"/{total / 1e6:.1f}" if total else "")
                ctx.progress(f"Downloading image: {size} MB", done / total if total else None)

            return get(session, ctx.cancel_event, report)

        self.startJob("sample", fetch, self.onSampleReady, what)

    def onShowQueue(self) -> None:
        if not self.ensureConnected():
            return
        strategy = self.ui.strategyComboBox.currentText or "random"
        self.queueStrategy = strategy
        self.fetchQueue(lambda answer: self.setStatus(self.fillQueue(answer)), "Fetching the queue")

    def fetchQueue(self, onDone: Callable[[Dict[str, Any]], Any], what: str = "", popup: bool = True) -> None:
        """The next ten images of the queue last asked for, fetched in the background."""
        client, strategy = self.logic.session.client, self.queueStrategy
        self.startJob("queue", lambda ctx: client.queue(strategy, 10), onDone, what, popup=popup)

    def fillQueue(self, answer: Dict[str, Any]) -> str:
        """Show the queue in its table; returns the line that says what the queue is."""
        rows, line = queue_table(answer)
        table = self.ui.queueTableWidget
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, cell in enumerate(row):
                table.setItem(r, c, qt.QTableWidgetItem(cell))
        table.setVisible(True)
        return line

    def refreshQueue(self) -> None:
        """Keep a queue on show current once an image is handed out (its row moves to the leased ones)."""
        if self.ui.queueTableWidget.visible and self.logic.session is not None:
            self.fetchQueue(self.fillQueue, popup=False)

    def onSampleReady(self, sample: Optional[Sample]) -> None:
        if sample is None:
            self.setStatus("Every image is labeled: nothing left to annotate.")
            return
        try:
            self.logic.showSample(sample)
        except Exception as e:
            self.showError("Loading the image", e)
            return
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        setSourceVolume(self.ui.segmentEditorWidget, self.logic.volumeNode)
        self.ui.currentImageLabel.text = sample.describe()
        self.ui.classTableWidget.setRowCount(0)
        self.setStatus(f"Loaded {sample.describe()}. Auto-segment it or start an empty segmentation.")
        self.updateButtons()
        self.refreshQueue()

    def onAutoSegment(self) -> None:
        if not self.ensureConnected() or not self.ensurePynrrd():
            return
        session = self.logic.session
        imageId = self.logic.sample.image_id
        self.startJob(
            "segment", lambda ctx: session.auto_segment(imageId), self.onSegmentationReady, "Running the model"
        )

    def onNewSegmentation(self) -> None:
        if not self.ensureConnected() or not self.ensurePynrrd():
            return
        session = self.logic.session
        imageId = self.logic.sample.image_id
        self.startJob(
            "segment",
            lambda ctx: session.empty_segmentation(imageId),
            self.onSegmentationReady,
            "Creating an empty segmentation",
        )

    def onSegmentationReady(self, result: Any) -> None:
        path = result.seg_path if isinstance(result, AutoSegmentation) else str(result)
        try:
            node = self.logic.showSegmentation(path)
        except Exception as e:
            self.showError("Loading the segmentation", e)
            return
        setSourceVolume(self.ui.segmentEditorWidget, self.logic.volumeNode)
        self.ui.segmentEditorWidget.setSegmentationNode(node)
        message = "Segmentation loaded: correct it with the editor, then submit."
        if isinstance(result, AutoSegmentation) and result.unknown_values:
            message += f" The model also returned values {result.unknown_values} that name no structure (left out)."
        self.setStatus(message)
        self.updateButtons()

    def onLoadNextToggled(self, checked: bool) -> None:
        self.logic.saveSetting(SETTINGS_LOAD_NEXT, bool(checked))

    def onSubmit(self) -> None:
        if not self.ensureConnected() or not self.ensurePynrrd():
            return
        if self.logic.segmentationNode is None or self.logic.sample is None:
            self.setStatus("Nothing to submit: load an image and a segmentation first.")
            return
        self.ui.segmentEditorWidget.setActiveEffect(None)  # finish any pending edit
        try:
            path = self.logic.saveSegmentation()
        except Exception as e:
            self.showError("Saving the segmentation", e)
            return
        session = self.logic.session
        imageId = self.logic.sample.image_id
        dropUnknown = bool(self.ui.dropUnknownCheckBox.checked)
        loadNext = bool(self.ui.loadNextCheckBox.checked)
        strategy = self.ui.strategyComboBox.currentText or "random"

        def submit(ctx: JobContext) -> SubmitResult:
            ctx.progress(f"Converting and uploading the label of {imageId}")
            return session.submit(
                path, imageId, drop_unknown=dropUnknown, load_next=loadNext, strategy=strategy, cancel=ctx.cancel_event
            )

        self.startJob("submit", submit, self.onSubmitted, "Submitting")

    def onSubmitted(self, result: SubmitResult) -> None:
        counts = ", ".join(f"{n} {c}" for n, c in result.voxels_per_name.items())
        message = f"Stored the final label of {result.image_id} ({counts} voxels)."
        if result.dropped_names:
            message += f" Left out: {', '.join(result.dropped_names)}."
        if result.overlap_voxels:
            message += f" {result.overlap_voxels} overlapping voxels were given to the later segment."
        self.setStatus(message)
        self.refreshProgress()
        if result.next_sample is not None:
            self.onSampleReady(result.next_sample)
            self.setStatus(message + f" Next image: {result.next_sample.image_id}.")

    def refreshProgress(self) -> None:
        session = self.logic.session
        if session is None:
            return

        def done(progress) -> None:
            self.showDatastoreProgress(progress.completed, progress.total)

        self.startJob("progress", lambda ctx: session.progress(), done, popup=False)

    # ------------------------------------------------------------------------------------------------ classification

    def onPredictClass(self) -> None:
        if not self.ensureConnected() or self.logic.sample is None:
            return
        session = self.logic.session
        imageId = self.logic.sample.image_id
        explain = self.ui.explainMethodComboBox.currentText if self.ui.explainCheckBox.checked else None
        self.startJob(
            "classify", lambda ctx: session.classify(imageId, explain=explain), self.onClassified, "Classifying"
        )

    def onClassified(self, result: ClassificationResult) -> None:
        if result.explanation_path and self.logic.sample is not None:
            try:
                self.logic.showExplanation(result.explanation_path, result.explanation_name(self.logic.sample.image_id))
            except Exception as e:
                self.showError("Loading the explanation map", e)
        table = self.ui.classTableWidget
        rows = sorted(result.probabilities.items(), key=lambda kv: -kv[1])
        table.setRowCount(len(rows))
        for row, (name, probability) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(name))
            table.setItem(row, 1, qt.QTableWidgetItem(f"{probability:.3f}"))
        if result.predicted:
            index = self.ui.classComboBox.findText(result.predicted)
            if index >= 0:
                self.ui.classComboBox.setCurrentIndex(index)
        self.setStatus(f"Predicted class: {result.predicted or 'unknown'}")
        self.updateButtons()

    def onSubmitClass(self) -> None:
        if not self.ensureConnected() or self.logic.sample is None:
            return
        className = self.ui.classComboBox.currentText
        session = self.logic.session
        imageId = self.logic.sample.image_id
        points = self.ui.findingsSelector.currentNode()
        findings = self.logic.findingsFromPoints(points, self.ui.findingRadiusSpinBox.value)
        marked = f" with {len(findings)} finding(s)" if findings else ""
        self.startJob(
            "submit-class",
            lambda ctx: session.submit_class(className, imageId, findings=findings),
            lambda r: self.setStatus(f"Stored class '{className}' for {imageId}{marked}."),
            "Submitting the class",
        )

    # ------------------------------------------------------------------------------------------------ training

    def onTrain(self) -> None:
        if not self.ensureConnected():
            return
        params = train_params(int(self.ui.maxEpochsSpinBox.value), float(self.ui.maxMinutesSpinBox.value))
        session = self.logic.session

        def started(result: Any) -> None:
            self._pollTraining = True
            self._trainingWasRunning = True
            self._pollFailures = 0
            self.logic.resetLearningCurve()
            self.setStatus("Training started; progress updates every few seconds.")

        self.startJob("train", lambda ctx: session.train_start(params=params), started, "Starting training")

    def onStopTrain(self) -> None:
        if not self.ensureConnected():
            return
        session = self.logic.session
        self.startJob(
            "train-stop",
            lambda ctx: session.train_stop(),
            lambda r: self.setStatus("Training stopped."),
            "Stopping training",
        )

    def onTrainingProgress(self, progress: TrainingProgress) -> None:
        self._pollFailures = 0
        done, total, unit = progress.counts()  # seconds when only the time budget ends the run
        bar = self.ui.trainProgressBar
        bar.format = "%v/%m s" if unit == "s" else "%v/%m"
        bar.maximum = max(1, total)
        bar.value = min(done, max(1, total))
        self.ui.trainStatusLabel.text = progress.summary()
        table = self.ui.diceTableWidget
        headers, rows = progress.table()
        table.setHorizontalHeaderLabels(headers)
        table.setRowCount(len(rows))
        for row, (name, value) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(name))
            table.setItem(row, 1, qt.QTableWidgetItem("-" if value is None else f"{value:.3f}"))
        if progress.history:
            self.logic.updateLearningCurve(progress.history)
        if progress.running:
            self._trainingWasRunning = True
            return
        self._pollTraining = False
        if self._trainingWasRunning:
            self._trainingWasRunning = False
            self.setStatus(f"Training finished: {progress.summary()}")
            info = self.logic.session.server if self.logic.session else None
            if info is not None:
                self.ui.modelMetricsLabel.text = info.metrics_summary()

    def onShowCurve(self) -> None:
        if not self.logic.showLearningCurve():
            self.setStatus("No learning curve yet: it appears after the first training epoch.")

    # ------------------------------------------------------------------------------------------------ datastore

    def onUploadVolumeChanged(self, node) -> None:
        if node is not None and not self.ui.uploadImageIdLineEdit.text:
            self.ui.uploadImageIdLineEdit.placeholderText = safeImageId(node.GetName())
        self.updateButtons()

    def onUpload(self) -> None:
        if not self.ensureConnected():
            return
        node = self.ui.uploadVolumeSelector.currentNode()
        if node is None:
            self.setStatus("Choose a volume to upload.")
            return
        imageId = self.ui.uploadImageIdLineEdit.text.strip() or safeImageId(node.GetName())
        try:
            path = self.logic.saveVolume(node, imageId)
        except Exception as e:
            self.showError("Saving the volume", e)
            return
        session = self.logic.session
        self.startJob(
            "upload",
            lambda ctx: session.upload_image(path, imageId),
            lambda newId: self.onUploaded(newId),
            f"Uploading {imageId}",
        )

    def onUploaded(self, imageId: str) -> None:
        self.setStatus(f"Added {imageId} to the datastore.")
        self.refreshProgress()

    def onBatchInfer(self) -> None:
        if not self.ensureConnected():
            return
        images = self.ui.batchImagesComboBox.currentText
        session = self.logic.session

        def started(result: Any) -> None:
            self._pollBatch = True
            self._batchWasRunning = True
            self.setStatus(f"Batch inference started on {images} images.")

        self.startJob("batch", lambda ctx: session.batch_infer_start(images), started, "Starting batch inference")

    def onBatchStop(self) -> None:
        if not self.ensureConnected():
            return
        session = self.logic.session
        self.startJob(
            "batch-stop",
            lambda ctx: session.batch_infer_stop(),
            lambda r: self.setStatus("Batch inference stopped."),
            "Stopping batch inference",
        )

    def onBatchProgress(self, progress: BatchProgress) -> None:
        self._pollFailures = 0
        self.ui.batchStatusLabel.text = progress.summary()
        if progress.state == "running":
            self._batchWasRunning = True
            return
        self._pollBatch = False
        if self._batchWasRunning:
            self._batchWasRunning = False
            self.setStatus(f"Batch inference finished: {progress.summary()}")
            self.refreshProgress()


#
# LabelLoopLogic
#


class LabelLoopLogic(ScriptedLoadableModuleLogic):
    """Connects the Lib's session to the scene: loads images and segmentations as nodes, saves them to files,
    keeps the learning curve table and plot. Never touches widgets."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = JobRunner()
        self.client: Optional[LabelLoopClient] = None
        self.session: Optional[AnnotationSession] = None
        self.sample: Optional[Sample] = None
        self.volumeNode = None
        self.segmentationNode = None
        self.explanationNode = None
        self.curveTableNode = None
        self.curveChartNode = None
        self.curveSeriesNodes: List[Any] = []

    @staticmethod
    def findingsFromPoints(pointListNode, radiusMm: float) -> Optional[List[Dict[str, Any]]]:
        """The point list's control points (world RAS) as class label findings; ``None`` without a point list."""
        if pointListNode is None:
            return None
        findings = []
        for i in range(pointListNode.GetNumberOfControlPoints()):
            ras = [0.0, 0.0, 0.0]
            pointListNode.GetNthControlPointPositionWorld(i, ras)
            findings.append(finding_from_ras(ras, radiusMm))
        return findings

    # ------------------------------------------------------------------------------------------------ settings

    @staticmethod
    def loadServerHistory() -> List[str]:
        return parse_history(qt.QSettings().value(SETTINGS_HISTORY, ""))

    @staticmethod
    def saveServerHistory(history: List[str]) -> None:
        qt.QSettings().setValue(SETTINGS_HISTORY, serialize_history(history))

    @staticmethod
    def loadSetting(key: str, default: bool) -> bool:
        value = qt.QSettings().value(key, default)
        return str(value).lower() in ("true", "1") if not isinstance(value, bool) else value

    @staticmethod
    def loadText(key: str, default: str = "") -> str:
        value = qt.QSettings().value(key, default)
        return default if value is None else str(value)

    @staticmethod
    def saveSetting(key: str, value: Any) -> None:
        qt.QSettings().setValue(key, value)

    # ------------------------------------------------------------------------------------------------ dependencies

    @staticmethod
    def hasPynrrd() -> bool:
        try:
            import nrrd  # noqa: F401
        except ImportError:
            return False
        return True

    @staticmethod
    def installPynrrd() -> None:
        slicer.util.pip_install("pynrrd")

    # ------------------------------------------------------------------------------------------------ session

    def connect(self, url: str, clientId: Optional[str] = None) -> AnnotationSession:
        """A new client and session for ``url`` (no request is sent here); ``clientId`` names the annotator to the
        server's leases (default ``user@host``)."""
        if self.client is not None:
            self.client.close()
        self.client = LabelLoopClient(url, client_id=clientId)
        cacheRoot = os.path.join(slicer.app.temporaryPath, "LabelLoop")
        cacheDir = os.path.join(cacheRoot, os.path.basename(default_cache_dir(self.client.server_url)))
        self.session = AnnotationSession(self.client, cache_dir=cacheDir)
        return self.session

    # ------------------------------------------------------------------------------------------------ nodes

    def segmentEditorNode(self):
        """The module's own segment editor parameter node (a singleton, so it survives module switches)."""
        node = slicer.mrmlScene.GetSingletonNode("LabelLoop", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.vtkMRMLSegmentEditorNode()
            node.SetSingletonTag("LabelLoop")
            node = slicer.mrmlScene.AddNode(node)
        return node

    def forgetNodes(self) -> None:
        self.sample = None
        self.volumeNode = None
        self.segmentationNode = None
        self.explanationNode = None
        self.curveTableNode = None
        self.curveChartNode = None
        self.curveSeriesNodes = []

    def _removeNode(self, node) -> None:
        if node is not None and slicer.mrmlScene.IsNodePresent(node):
            slicer.mrmlScene.RemoveNode(node)

    def showSample(self, sample: Sample):
        """Load the sample image (replacing the previous sample, its segmentation and explanation map) and show it."""
        self._removeNode(self.segmentationNode)
        self._removeNode(self.explanationNode)
        self._removeNode(self.volumeNode)
        self.segmentationNode = None
        self.explanationNode = None
        node = slicer.util.loadVolume(sample.path, {"name": sample.image_id, "show": True})
        self.volumeNode = node
        self.sample = sample
        slicer.util.setSliceViewerLayers(background=node, fit=True)
        return node

    def showExplanation(self, path: str, name: str):
        """Overlay a classification's explanation map (values 0-1 on the sample's grid) on the sample, replacing the
        previous map."""
        self._removeNode(self.explanationNode)
        node = slicer.util.loadVolume(path, {"name": name, "show": False})
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        self.explanationNode = node
        slicer.util.setSliceViewerLayers(background=self.volumeNode, foreground=node, foregroundOpacity=0.4)
        return node

    def showSegmentation(self, path: str):
        """Load a ``.seg.nrrd`` as the current segmentation (replacing the previous one) on the sample's grid."""
        self._removeNode(self.segmentationNode)
        node = slicer.util.loadSegmentation(path)
        if self.volumeNode is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        if self.sample is not None:
            node.SetName(f"{self.sample.image_id} segmentation")
        self.segmentationNode = node
        return node

    def saveSegmentation(self) -> str:
        """Write the current segmentation to a ``.seg.nrrd`` in the session cache; returns its path."""
        if self.segmentationNode is None or self.sample is None or self.session is None:
            raise RuntimeError("no segmentation to save")
        folder = os.path.join(self.session.cache_dir, "edited")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{safeImageId(self.sample.image_id)}.seg.nrrd")
        if not slicer.util.saveNode(self.segmentationNode, path):
            raise RuntimeError(f"Slicer could not write {path}")
        return path

    def saveVolume(self, volumeNode, imageId: str) -> str:
        """Write a volume to a NIfTI file named after ``imageId`` (the server keeps the file's extension)."""
        folder = tempfile.mkdtemp(prefix="labelloop-upload-", dir=slicer.app.temporaryPath)
        path = os.path.join(folder, f"{imageId}.nii.gz")
        if not slicer.util.saveNode(volumeNode, path):
            raise RuntimeError(f"Slicer could not write {path}")
        return path

    # ------------------------------------------------------------------------------------------------ learning curve

    def resetLearningCurve(self) -> None:
        if self.curveTableNode is not None:
            self.curveTableNode.RemoveAllColumns()

    def updateLearningCurve(self, history: List[Dict[str, Any]]) -> None:
        """Put the loss and the trainer's metrics (mean Dice, or ROC AUC and balanced accuracy) per epoch in a table
        node plotted by a chart node; a trainer that records other metrics gets a new chart."""
        columns = ["epoch", *curve_columns(history)]
        arrays = [np.array([np.nan if e.get(c) is None else float(e[c]) for e in history]) for c in columns]
        chart = self.curveChartNode
        if (
            chart is not None
            and slicer.mrmlScene.IsNodePresent(chart)
            and chart.GetAttribute("columns") != ",".join(columns)
        ):
            for node in [chart, *self.curveSeriesNodes, self.curveTableNode]:
                self._removeNode(node)
            self.curveChartNode, self.curveSeriesNodes, self.curveTableNode = None, [], None
        if self.curveTableNode is None or not slicer.mrmlScene.IsNodePresent(self.curveTableNode):
            self.curveTableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "LabelLoop training")
            self.curveChartNode = None
        slicer.util.updateTableFromArray(self.curveTableNode, arrays, columns)
        if self.curveChartNode is None or not slicer.mrmlScene.IsNodePresent(self.curveChartNode):
            self.curveChartNode = self._createChart(self.curveTableNode, columns[1:])
            self.curveChartNode.SetAttribute("columns", ",".join(columns))

    def _createChart(self, tableNode, columns: List[str]):
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", "LabelLoop learning curve")
        chart.SetTitle("Training")
        chart.SetXAxisTitle("epoch")
        chart.SetYAxisTitle(curve_axis_title(columns))
        palette = {"loss": (0.85, 0.33, 0.1), "train_mean_dice": (0.47, 0.67, 0.19), "val_mean_dice": (0.0, 0.45, 0.74)}
        palette.update({"train_auc": palette["train_mean_dice"], "val_auc": palette["val_mean_dice"]})
        self.curveSeriesNodes = []
        for column in columns:
            series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
            self.curveSeriesNodes.append(series)
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*palette.get(column, llcolors.color_for(column)))
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return chart

    def showLearningCurve(self) -> bool:
        if self.curveChartNode is None or not slicer.mrmlScene.IsNodePresent(self.curveChartNode):
            return False
        slicer.modules.plots.logic().ShowChartInLayout(self.curveChartNode)
        return True


def setSourceVolume(editorWidget, volumeNode) -> None:
    """``setSourceVolumeNode`` (Slicer 5.2+) or ``setMasterVolumeNode`` (earlier)."""
    if hasattr(editorWidget, "setSourceVolumeNode"):
        editorWidget.setSourceVolumeNode(volumeNode)
    else:
        editorWidget.setMasterVolumeNode(volumeNode)


def safeImageId(name: str) -> str:
    """A datastore id from a node name: letters, digits, ``_ - .``, starting with a letter or digit."""
    ident = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._-")
    return ident[:200] or "image"


def training_from_info(info: ServerInfo, model: str) -> Optional[TrainingProgress]:
    """The last training run's statistics known at connect time, if any."""
    stats = info.train_stats.get(model)
    if not stats:
        return None
    progress = training_from_stats(stats, list(info.models[model].labels) if model in info.models else [])
    progress.state = "done"
    return progress


#
# LabelLoopTest
#


class LabelLoopTest(ScriptedLoadableModuleTest):
    """Exercises the Lib inside Slicer, offline: segmentation files must round-trip through Slicer's own reader
    and writer with names (non-ASCII included), colors and label values intact, and jobs must deliver results."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_seg_nrrd_round_trip_through_slicer()
        self.setUp()
        self.test_job_runner()
        self.setUp()
        self.test_learning_curve_follows_the_trainer()
        self.setUp()
        self.test_explanation_map_overlays_the_sample_until_the_next()
        self.setUp()
        self.test_annotator_names_the_client_to_the_leases()

    def test_seg_nrrd_round_trip_through_slicer(self) -> None:
        self.delayDisplay("Segmentation file round trip through Slicer")
        if not LabelLoopLogic.hasPynrrd():
            LabelLoopLogic.installPynrrd()
        from LabelLoopLib import segio

        labelmap = np.zeros((24, 20, 12), dtype=np.uint8)
        labelmap[2:10, 3:12, 2:8] = 1
        labelmap[12:20, 5:15, 4:10] = 2
        labelmap[5:9, 14:18, 1:4] = 7
        names = {"liver": 1, "spleen": 2, "Leber-Äste 肝": 7}
        geometry = segio.Geometry.create((1.5, 1.2, 2.5), (10.0, -20.0, 30.0), [[-1, 0, 0], [0, 0, 1], [0, -1, 0]])
        segments = [(n, v, llcolors.color_for(n)) for n, v in names.items()]
        folder = tempfile.mkdtemp(prefix="labelloop-test-", dir=slicer.app.temporaryPath)
        path = segio.write_seg_nrrd(os.path.join(folder, "in.seg.nrrd"), labelmap, geometry, segments)

        node = slicer.util.loadSegmentation(path)
        segmentation = node.GetSegmentation()
        loaded = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(loaded, list(names))

        out = os.path.join(folder, "out.seg.nrrd")
        self.assertTrue(slicer.util.saveNode(node, out))
        data = segio.read_seg_nrrd(out)
        self.assertEqual(sorted(data.names), sorted(names))
        placed = segio.place_on_grid(data, labelmap.shape, geometry)
        rebuilt, unknown = segio.labelmap_from_segments(placed, names)
        self.assertEqual(unknown, [])
        self.assertTrue(np.array_equal(rebuilt, labelmap))
        for seg in data.segments:
            self.assertTrue(np.allclose(seg.color, llcolors.color_for(seg.name), atol=1e-3))
        self.delayDisplay("Round trip passed")

    def test_job_runner(self) -> None:
        self.delayDisplay("Background job delivered on the main thread")
        runner = JobRunner()
        results = []
        runner.submit("square", lambda ctx: 7 * 7, on_done=results.append)
        self.assertTrue(runner.wait_all(10))
        runner.poll()
        self.assertEqual(results, [49])
        self.delayDisplay("Job runner passed")

    def test_annotator_names_the_client_to_the_leases(self) -> None:
        self.delayDisplay("Annotator name of the panel's client")
        logic = LabelLoopLogic()
        self.assertEqual(logic.connect("http://127.0.0.1:1", "reader-2").client.client_id, "reader-2")
        self.assertEqual(logic.connect("http://127.0.0.1:1").client.client_id, default_client_id())
        logic.saveSetting(SETTINGS_ANNOTATOR, "reader-3")
        self.assertEqual(logic.loadText(SETTINGS_ANNOTATOR), "reader-3")
        logic.saveSetting(SETTINGS_ANNOTATOR, "")
        self.delayDisplay("Annotator name passed")

    def test_learning_curve_follows_the_trainer(self) -> None:
        self.delayDisplay("Learning curve of a segmentation, then of a classification trainer")
        logic = LabelLoopLogic()
        logic.updateLearningCurve([{"epoch": 1, "loss": 0.9, "val_mean_dice": 0.3}])
        logic.updateLearningCurve([{"epoch": 1, "loss": 0.9, "val_mean_dice": 0.3}, {"epoch": 2, "val_mean_dice": 0.5}])
        first = logic.curveChartNode
        self.assertEqual(first.GetYAxisTitle(), "loss / Dice")
        self.assertEqual(logic.curveTableNode.GetNumberOfRows(), 2)
        logic.updateLearningCurve([{"epoch": 1, "loss": 0.6, "val_auc": 0.7, "val_balanced_accuracy": 0.6}])
        self.assertFalse(slicer.mrmlScene.IsNodePresent(first))
        self.assertEqual(logic.curveChartNode.GetYAxisTitle(), "loss / ROC AUC, balanced accuracy")
        self.assertEqual(len(logic.curveSeriesNodes), 4)  # loss, train and val AUC, balanced accuracy
        self.assertEqual(logic.curveTableNode.GetNumberOfColumns(), 5)
        self.delayDisplay("Learning curve passed")

    def test_explanation_map_overlays_the_sample_until_the_next(self) -> None:
        self.delayDisplay("Explanation map over the sample")
        import SimpleITK as sitk

        folder = tempfile.mkdtemp(prefix="labelloop-test-", dir=slicer.app.temporaryPath)
        paths = {}
        for name, values in (("scan", np.full((8, 10, 12), 40, np.int16)), ("map", np.linspace(0, 1, 960))):
            image = sitk.GetImageFromArray(values.reshape(8, 10, 12).astype(values.dtype))
            image.SetSpacing((1.5, 1.0, 3.0))
            paths[name] = os.path.join(folder, f"{name}.nii.gz")
            sitk.WriteImage(image, paths[name])
        logic = LabelLoopLogic()
        logic.showSample(Sample("scan", paths["scan"]))
        node = logic.showExplanation(paths["map"], "scan gradcam lesion")
        composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), node.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), logic.volumeNode.GetID())
        self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.4)
        self.assertEqual(node.GetName(), "scan gradcam lesion")
        self.assertEqual((node.GetDisplayNode().GetWindowLevelMin(), node.GetDisplayNode().GetWindowLevelMax()), (0, 1))
        logic.showSample(Sample("scan", paths["scan"]))
        self.assertFalse(slicer.mrmlScene.IsNodePresent(node))
        self.delayDisplay("Explanation map passed")


__all__ = ["LabelLoop", "LabelLoopLogic", "LabelLoopTest", "LabelLoopWidget"]
