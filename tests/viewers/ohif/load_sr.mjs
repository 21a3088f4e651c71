// Load a SmartNodule SR the way OHIF v3's SR viewport does, with OHIF's published code, and print JSON.
//
// usage: node load_sr.mjs SR.dcm SOURCE.dcm
//
// What runs is the published code itself: @ohif/extension-cornerstone-dicom-sr (its UMD build) for
// the SOP class handler (display set, measurements, mapping them onto the source image's display set,
// the DICOMSRDisplay annotations and their text lines) and for hydrateStructuredReport (editable
// measurements), which calls @cornerstonejs/adapters' MeasurementReport.generateToolState;
// @cornerstonejs/core and tools for geometry and annotation state; dcmjs to read and naturalize the
// files, as OHIF's local data source does. What this script supplies is only the host around them:
// the OHIF services the extension calls (display sets, measurement service, customizations,
// notifications), a data source with one image id for the source image, the cornerstone metadata of
// that image, and stand-ins for @ohif/core's small helpers and the React/i18n modules the UMD build
// requires at load time but that the SR parsing does not use.
import fs from 'node:fs';
import Module, { createRequire } from 'node:module';

import * as csCore from '@cornerstonejs/core';
import * as csTools from '@cornerstonejs/tools';
import * as adapters from '@cornerstonejs/adapters';
import * as glMatrix from 'gl-matrix';
import dcmjs from 'dcmjs';

const [srPath, sourcePath] = process.argv.slice(2);
if (!srPath || !sourcePath) {
  console.error('usage: node load_sr.mjs SR.dcm SOURCE.dcm');
  process.exit(2);
}

// OHIF logs while it works; keep stdout for the JSON result.
const logs = [];
for (const level of ['log', 'info', 'warn', 'debug']) {
  console[level] = (...args) => logs.push(`${level}: ${args.map(a => (typeof a === 'string' ? a : JSON.stringify(a)?.slice(0, 200))).join(' ')}`);
}

function readNaturalized(path) {
  const bytes = fs.readFileSync(path);
  const file = dcmjs.data.DicomMessage.readFile(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
  return dcmjs.data.DicomMetaDictionary.naturalizeDataset(file.dict);
}

const sr = readNaturalized(srPath);
const source = readNaturalized(sourcePath);
const imageId = `smartnodule:${source.SOPInstanceUID}`;
const frameOfReferenceUID = source.FrameOfReferenceUID || `${source.SeriesInstanceUID}.for`;
const spacing = (source.PixelSpacing || source.ImagerPixelSpacing || [1, 1]).map(Number);

// The cornerstone metadata OHIF's image loader gives a projection radiograph without a patient
// position: origin at the centre of the first pixel, rows along x, columns along y.
const imagePlaneModule = {
  frameOfReferenceUID, rows: source.Rows, columns: source.Columns,
  rowCosines: [1, 0, 0], columnCosines: [0, 1, 0], imageOrientationPatient: [1, 0, 0, 0, 1, 0],
  imagePositionPatient: [0, 0, 0], rowPixelSpacing: spacing[0], columnPixelSpacing: spacing[1],
};
csCore.metaData.addProvider((type, id) => {
  if (id !== imageId) return undefined;
  if (type === 'imagePlaneModule') return imagePlaneModule;
  if (type === 'instance') {
    return { StudyInstanceUID: source.StudyInstanceUID, SeriesInstanceUID: source.SeriesInstanceUID,
             SOPInstanceUID: source.SOPInstanceUID, SOPClassUID: source.SOPClassUID, FrameOfReferenceUID: frameOfReferenceUID };
  }
  return undefined;
}, 10000);

// The one browser global cornerstone's annotation state tests against (`selector instanceof HTMLDivElement`).
globalThis.HTMLDivElement ??= class HTMLDivElement {};

// Host stand-ins for modules the UMD build requires (see the header).
let guid = 0;
const ohifCore = {
  utils: {
    guid: () => `display-set-${++guid}`,
    sortStudyInstances: instances => instances,
    sortDisplaySetsCopy: displaySets => [...displaySets],
    sopClassDictionary: {
      BasicTextSR: '1.2.840.10008.5.1.4.1.1.88.11', EnhancedSR: '1.2.840.10008.5.1.4.1.1.88.22',
      ComprehensiveSR: '1.2.840.10008.5.1.4.1.1.88.33', Comprehensive3DSR: '1.2.840.10008.5.1.4.1.1.88.34',
    },
  },
  classes: { MetadataProvider: { getUIDsFromImageID: id => (id === imageId ? { SOPInstanceUID: source.SOPInstanceUID } : {}) } },
  DicomMetadataStore: { getInstance: () => sr },
};
const stubs = {
  '@ohif/core': ohifCore,
  '@ohif/extension-cornerstone': { Enums: { CORNERSTONE_3D_TOOLS_SOURCE_NAME: 'Cornerstone3DTools', CORNERSTONE_3D_TOOLS_SOURCE_VERSION: '0.1' } },
  '@ohif/i18n': { t: text => text },
  '@ohif/ui-next': {},
  '@ohif/core/src/contextProviders/SystemProvider': { useSystem: () => ({}) },
  '@cornerstonejs/core': csCore,
  '@cornerstonejs/tools': csTools,
  '@cornerstonejs/adapters': adapters,
  'gl-matrix': glMatrix,
};
const load = Module._load;
Module._load = function (request, ...rest) {
  return Object.prototype.hasOwnProperty.call(stubs, request) ? stubs[request] : load.call(this, request, ...rest);
};
const require = createRequire(import.meta.url);
const srExtension = require('@ohif/extension-cornerstone-dicom-sr');
const extension = srExtension.default;

// The source image's display set, as OHIF's image SOP class handler makes it.
const imageDisplaySet = {
  displaySetInstanceUID: 'source-image', StudyInstanceUID: source.StudyInstanceUID,
  SeriesInstanceUID: source.SeriesInstanceUID, FrameOfReferenceUID: frameOfReferenceUID,
  SOPClassUID: source.SOPClassUID, imageIds: [imageId], isDerivedDisplaySet: false, unsupported: false,
};
const displaySets = new Map([[imageDisplaySet.displaySetInstanceUID, imageDisplaySet]]);
// The annotation types OHIF's cornerstone extension maps to measurements (its measurement service init).
const mappedTypes = ['Length', 'Bidirectional', 'EllipticalROI', 'CircleROI', 'ArrowAnnotate', 'Angle',
  'CobbAngle', 'RectangleROI', 'PlanarFreehandROI', 'Probe'];
const rawMeasurements = [];
const notifications = [];
const servicesManager = {
  services: {
    displaySetService: {
      activeDisplaySets: [imageDisplaySet],
      EVENTS: { DISPLAY_SETS_ADDED: 'event::displaySetsAdded' },
      subscribe: () => ({ unsubscribe() {} }),
      getDisplaySetByUID: uid => displaySets.get(uid),
      getDisplaySetsBy: test => [...displaySets.values()].filter(test),
    },
    measurementService: {
      getSourceMappings: () => mappedTypes.map(annotationType => ({ annotationType, toMeasurementSchema: x => x })),
      getSource: () => ({ name: 'Cornerstone3DTools', version: '0.1' }),
      addRawMeasurement: (_source, annotationType, { annotation }) => {
        rawMeasurements.push({ annotationType, annotation });
        return `measurement-${rawMeasurements.length}`;
      },
    },
    // OHIF's defaults: an empty coding-values table, no other customization.
    customizationService: { getCustomization: name => (name === 'codingValues' ? {} : undefined) },
    uiNotificationService: { show: message => notifications.push(message) },
  },
};
const dataSource = { getImageIdsForDisplaySet: ds => ds.imageIds, retrieve: { bulkDataURI: async () => { throw new Error('no bulk data'); } } };
const extensionManager = { getDataSources: () => [dataSource], getActiveDataSource: () => [dataSource] };
const commandsManager = { runCommand: () => undefined };

const imagePoint = world => csCore.utilities.worldToImageCoords(imageId, world);
const result = { notifications, logs };
try {
  extension.preRegistration({ servicesManager, configuration: {} });
  const [handler] = extension.getSopClassHandlerModule({ servicesManager, extensionManager });
  const [srDisplaySet] = handler.getDisplaySetsFromSeries([sr]);
  displaySets.set(srDisplaySet.displaySetInstanceUID, srDisplaySet);
  await srDisplaySet.load();
  result.isImagingMeasurementReport = srDisplaySet.isImagingMeasurementReport;
  result.isRehydratable = srDisplaySet.isRehydratable;
  result.referencedImages = srDisplaySet.referencedImages;
  result.measurements = srDisplaySet.measurements.map(m => ({
    loaded: m.loaded, imageId: m.imageId ?? null, displaySetInstanceUID: m.displaySetInstanceUID ?? null,
    TrackingIdentifier: m.TrackingIdentifier, labels: m.labels,
    coords: m.coords.map(c => ({ ValueType: c.ValueType, GraphicType: c.GraphicType, GraphicData: Array.from(c.GraphicData) })),
  }));
  // What the SR viewport draws: the DICOMSRDisplay annotations and the text box lines of its tool.
  const displayTool = csTools.state.tools.DICOMSRDisplay.toolClass.prototype;
  result.drawn = csTools.annotation.state.getAllAnnotations().map(a => ({
    toolName: a.metadata.toolName, graphicType: a.metadata.graphicType, referencedImageId: a.metadata.referencedImageId,
    points: a.data.handles.points.map(p => Array.from(p)), imagePoints: a.data.handles.points.map(p => Array.from(imagePoint(p))),
    label: a.data.label ?? null, textLines: displayTool._getTextBoxLinesFromLabels(a.data.labels || []),
  }));
  if (srDisplaySet.isRehydratable) {
    srExtension.hydrateStructuredReport({ servicesManager, extensionManager, commandsManager }, srDisplaySet.displaySetInstanceUID);
  }
  result.hydrated = rawMeasurements.map(({ annotationType, annotation }) => ({
    annotationType, referencedImageId: annotation.metadata.referencedImageId,
    points: annotation.data.handles.points.map(p => Array.from(p)),
    imagePoints: annotation.data.handles.points.map(p => Array.from(imagePoint(p))),
    finding: annotation.data.finding?.text ?? null,
    findingSites: (annotation.data.findingSites || []).map(site => site.text),
  }));
  result.error = null;
} catch (error) {
  result.error = `${error.name}: ${error.message}`;
  result.stack = String(error.stack).split('\n').slice(0, 6);
}
process.stdout.write(`${JSON.stringify(result, null, 1)}\n`);
