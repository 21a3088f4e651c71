-- Forward every chest radiograph (CR, DX) that Orthanc stores to the SmartNodule node.
-- Results coming back from the node (SR, OT/SC, DOC, PR) are not forwarded, so nothing loops.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and origin['RequestOrigin'] ~= 'Lua' then
    SendToModality(instanceId, 'smartnodule')
  end
end
